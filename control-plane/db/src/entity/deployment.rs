use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deployments")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub model_name: String,
    pub model_version: String,
    pub digest: String,
    pub selector: String,
    pub replicas: i32,
    pub slots: i32,
    pub context_per_slot: i32,
    pub gpu_layers: i32,
    pub created_at: i64,
    pub updated_at: i64,
    pub created_by: String,
    pub max_unavailable: i32,
    /// JSON of the last rollout; empty before the first.
    #[sea_orm(column_type = "Text")]
    pub rollout: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
