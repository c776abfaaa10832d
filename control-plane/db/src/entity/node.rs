use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "nodes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(unique)]
    pub name: String,
    pub state: String,
    pub cordoned: bool,
    pub draining: bool,
    #[sea_orm(column_type = "Text")]
    pub labels: String,
    pub agent_version: String,
    #[sea_orm(column_type = "Text")]
    pub inventory: String,
    pub desired_generation: i64,
    pub applied_generation: i64,
    pub enrolled_at: i64,
    pub state_changed_at: i64,
    pub certificate_serial: String,
    pub certificate_not_after: i64,
    /// JSON array of the node's assigned models (see `AssignedModel`).
    #[sea_orm(column_type = "Text")]
    pub desired_models: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
